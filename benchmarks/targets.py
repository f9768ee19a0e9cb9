"""The project's acceptance targets: PASS/MISS of each target on the rows of a bench run.

The targets are goals of this project, not part of the package, so ``tbptt-fast bench``
prints only the comparison table; this script adds the targets table, either from the JSON
of an earlier run or after running the benchmark itself (same options as ``tbptt-fast
bench``; the JSON it writes also holds the evaluated targets):

    python benchmarks/targets.py benchmarks/results/full.json
    python benchmarks/targets.py --full --json benchmarks/results/full.json

Each target names a filter on the configurations and is evaluated on every matching row
present; the PyTorch targets are stated for LSTM, and rows of the other cells are reported
with the same threshold for information (``official`` False, marked ``(info)``).
"""

from __future__ import annotations

import json
import sys

from tbptt_fast.bench import harness
from tbptt_fast.bench.report import format_table, save

# (description, filter, kind, impl, other, threshold); filter None entries match anything.
TARGETS = [
    ("cpu >= 6x numpy", dict(hidden=64, batch=8, k1=16, k2=16), "ratio", "cpu", "numpy", 6.0),
    ("cpu >= 2.5x numpy", dict(hidden=256, batch=32, k1=16, k2=16), "ratio", "cpu", "numpy",
     2.5),
    ("cpu >= 85% of GEMM peak", dict(cell="lstm", hidden=1024, batch=32, k1=64, k2=64,
     threads=2), "peak", "cpu", None, 0.85),
    ("cpu step cost (16,64) <= 3.2x (16,16)", dict(hidden=256, batch=32, k1=16, k2=64),
     "step_cost", "cpu", None, 3.2),
    ("cpu >= 4x best torch", dict(hidden=64, batch=8, k1=16, k2=16), "torch", "cpu", None, 4.0),
    ("cpu >= 3x best torch", dict(hidden=64, batch=32, k1=16, k2=16), "torch", "cpu", None,
     3.0),
    ("cpu >= 1.2x best torch", dict(hidden=256, batch=32, k1=16, k2=16, threads=2), "torch",
     "cpu", None, 1.2),
    ("cpu >= 1.0x best torch", dict(hidden=1024, batch=32, k1=64, k2=64, threads=2), "torch",
     "cpu", None, 1.0),
    ("cpu >= 2x best torch", dict(hidden=256, batch=32, k1=16, k2=64), "torch", "cpu", None,
     2.0),
    ("cpu-recompute >= 2x best torch", dict(hidden=256, batch=32, k1=16, k2=64), "torch",
     "cpu-recompute", None, 2.0),
    ("cpu >= 2x best torch", dict(hidden=256, batch=32, k1=1, k2=16), "torch", "cpu", None,
     2.0),
    ("cpu-recompute >= 2x best torch", dict(hidden=256, batch=32, k1=1, k2=16), "torch",
     "cpu-recompute", None, 2.0),
    ("torch-bridge >= 0.85x cpu", dict(hidden=256, batch=32, k1=16, k2=16), "ratio",
     "torch-bridge", "cpu", 0.85),
    ("torch-bridge >= 1.3x best torch", dict(hidden=256, batch=32, k1=16, k2=16), "torch",
     "torch-bridge", None, 1.3),
    ("torch-bridge >= 1.8x torch-recompute", dict(hidden=256, batch=32, k1=16, k2=64), "ratio",
     "torch-bridge", "torch-recompute", 1.8),
    # portable kernels and batch-parallel threads (the AVX2 machine kind and every core)
    ("cpu >= 85% of GEMM peak", dict(cell="lstm", hidden=64, batch=8, k1=16, k2=16,
     threads=1), "peak", "cpu", None, 0.85),
    ("cpu 2 threads >= 1.7x 1 thread", dict(cell="lstm", hidden=64, batch=32, k1=16, k2=16,
     threads=2), "threads", "cpu", None, 1.7),
    ("cpu >= 3x best torch", dict(cell="lstm", hidden=256, batch=32, k1=16, k2=64, threads=2),
     "torch", "cpu", None, 3.0),
    ("cpu >= 1.5x best torch", dict(cell="lstm", hidden=1024, batch=32, k1=64, k2=64,
     threads=2), "torch", "cpu", None, 1.5),
    ("cpu more threads >= 0.9x 1 thread", dict(), "threads", "cpu", None, 0.9),
    ("cpu >= 6x textbook", dict(hidden=64), "textbook", "cpu", None, 6.0),
    ("cpu >= 2.5x textbook", dict(hidden=1024), "textbook", "cpu", None, 2.5),
]  # fmt: skip


def evaluate_targets(rows: list[dict]) -> list[dict]:
    """One entry per (target, matching configuration) present in ``rows``.

    The PyTorch targets are stated for LSTM; rows of the other cells are reported with
    the same threshold for information (``official`` is False for them).
    """
    ok = [r for r in rows if r["status"] == "ok"]
    index = {}
    for r in ok:
        index[(r["cell"], r["hidden"], r["batch"], r["k1"], r["k2"], r["threads"], r["impl"])] = r
    out = []
    for desc, filt, kind, impl, other, thr in TARGETS:
        for r in ok:
            if r["impl"] != impl or any(r[k] != v for k, v in filt.items()):
                continue
            key = (r["cell"], r["hidden"], r["batch"], r["k1"], r["k2"], r["threads"])
            if kind == "ratio":
                o = index.get((*key, other))
                value = r["throughput"] / o["throughput"] if o else None
                good = value is not None and value >= thr
            elif kind == "peak":
                value = r.get("gemm_fraction")
                good = value is not None and value >= thr
            elif kind == "step_cost":
                base = index.get((*key[:3], 16, 16, key[5], impl))
                value = base["throughput"] / r["throughput"] if base else None
                good = value is not None and value <= thr
            elif kind == "threads":  # throughput against the same row at 1 thread
                base = index.get((*key[:5], 1, impl))
                value = r["throughput"] / base["throughput"] if base and key[5] > 1 else None
                good = value is not None and value >= thr
            elif kind == "torch":
                value = r.get("vs_best_torch")
                good = value is not None and value >= thr
            else:  # textbook
                value = r.get("vs_textbook")
                good = value is not None and value >= thr
            if value is None:
                continue
            out.append(
                {
                    "target": desc,
                    "config": f"{r['cell']} H={r['hidden']} B={r['batch']} "
                    f"({r['k1']},{r['k2']}) t={r['threads']}",
                    "value": value,
                    "threshold": thr,
                    "pass": bool(good),
                    "official": kind != "torch" or r["cell"] == "lstm",
                }
            )
    return out


def format_targets(targets: list[dict]) -> str:
    lines = ["| target | config | value | result |", "|---|---|---|---|"]
    for t in targets:
        mark = "PASS" if t["pass"] else "MISS"
        if not t["official"]:
            mark += " (info)"
        lines.append(f"| {t['target']} | {t['config']} | {t['value']:.2f} | {mark} |")
    return "\n".join(lines)


def report_with_targets(
    result: dict, json_path: str | None, plot_path: str | None, log=print
) -> None:
    """The comparison table, then the targets table; write the JSON (with a ``targets``
    entry) and the plot when asked."""
    result["targets"] = evaluate_targets(result["rows"])
    log("")
    log(format_table(result["rows"]))
    if result["targets"]:
        log("")
        log(format_targets(result["targets"]))
    save(result, json_path, plot_path, log)


def main(argv: list[str] | None = None) -> int:
    p = harness.build_parser(prog="python benchmarks/targets.py")
    p.description = __doc__.split("\n\n")[0]
    p.add_argument(
        "results",
        nargs="?",
        help="JSON of an earlier run (tbptt-fast bench --json) to evaluate instead of running",
    )
    args = p.parse_args(argv)
    if args.results:
        with open(args.results) as f:
            rows = json.load(f)["rows"]
        targets = evaluate_targets(rows)
        print(format_targets(targets) if targets else "no row of this run matches a target")
        return 0

    def log(msg):
        print(msg, flush=True)

    result = harness.run_from_args(args, log)
    if result is None:
        return 2
    report_with_targets(result, args.json, args.plot, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
