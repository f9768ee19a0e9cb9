"""Weak scaling of data-parallel TBPTT over MPI (tbptt_fast.distributed).

Run it once per rank count, one BLAS thread per rank, the same streams per rank:

    mpiexec -n 1 python benchmarks/bench_distributed.py --json benchmarks/results/dist-1.json
    mpiexec -n 2 python benchmarks/bench_distributed.py --json benchmarks/results/dist-2.json
    python benchmarks/bench_distributed.py --table benchmarks/results/dist-*.json

Per configuration it reports, from rank 0 (the slowest rank's numbers where
they differ): throughput per rank (steps x streams / s / rank), the time per
update, the share of the training time spent in the two all-reduces of each
update (the block's loss sum and count, and the gradient; this includes waiting
for the slowest rank), the gradient's size, and the time of one all-reduce of
that size measured alone (median of 50, after a barrier).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import time

import numpy as np

CONFIGS = [  # (cell, H, streams per rank, k1, k2, steps)
    ("lstm", 64, 16, 16, 16, 1024),
    ("lstm", 256, 16, 32, 32, 256),
    ("lstm", 1024, 8, 32, 32, 64),
]


def _machine_busy() -> float | None:
    """CPU seconds the whole machine was busy so far (None without psutil)."""
    try:
        import psutil
    except ImportError:
        return None
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def _others_share(before, after, own: float, wall: float) -> float:
    """The share of the machine's cores that other processes kept busy during a fit."""
    if before is None or after is None or wall <= 0:
        return float("nan")
    return max(0.0, (after - before - own) / (wall * (os.cpu_count() or 1)))


def run(json_path: str | None, repeats: int) -> None:
    from mpi4py import MPI

    import tbptt_fast as tb
    from tbptt_fast.distributed import DistributedTrainer

    tb.set_num_threads(1)
    comm = MPI.COMM_WORLD
    rank, size = comm.rank, comm.size
    rows = []
    for cell, H, b, k1, k2, T in CONFIGS:
        D, O = H, 16
        rng = np.random.default_rng(rank)
        x = rng.normal(size=(T, b, D)).astype(np.float32)
        y = rng.normal(size=(T, b, O)).astype(np.float32)
        model = tb.Model(cell, input_size=D, hidden_size=H, output_size=O, seed=0)
        t = DistributedTrainer(model, k1=k1, k2=k2, optimizer=tb.SGD(lr=1e-3), comm=comm)
        t.fit(x[: 2 * k1], y[: 2 * k1])  # warm up (allocations, first touch)
        best = None
        for _ in range(repeats):  # the repeat whose slowest rank was fastest
            t.comm_seconds, t.comm_calls = 0.0, 0
            comm.Barrier()
            busy0, cpu0 = _machine_busy(), time.process_time()
            t0 = time.perf_counter()
            res = t.fit(x, y)
            wall = time.perf_counter() - t0
            own = comm.allreduce(time.process_time() - cpu0)  # CPU seconds of all ranks
            slowest = comm.allreduce(wall, op=MPI.MAX)
            others = _others_share(busy0, _machine_busy(), own, slowest)
            if best is None or slowest < best[0]:
                best = (slowest, wall, t.comm_seconds, len(res.losses), others)
        _, wall, comm_s, updates, others = best
        nparams = sum(a.size for a in model.param_list())
        grad = np.zeros(nparams, np.float32)
        times = []
        for _ in range(50):
            comm.Barrier()
            s = time.perf_counter()
            comm.Allreduce(MPI.IN_PLACE, grad)
            times.append(time.perf_counter() - s)
        mine = {
            "wall": wall,
            "comm": comm_s,
            "updates": updates,
            "allreduce_alone": float(np.median(times)),
        }
        every = comm.gather(mine, root=0)
        if rank == 0:
            slowest = max(every, key=lambda m: m["wall"])
            row = {
                "ranks": size,
                "cell": cell,
                "H": H,
                "streams_per_rank": b,
                "k1": k1,
                "k2": k2,
                "steps": T,
                "grad_bytes": nparams * 4,
                "throughput_per_rank": T * b / slowest["wall"],
                "ms_per_update": 1e3 * slowest["wall"] / slowest["updates"],
                "comm_share": max(m["comm"] / m["wall"] for m in every),
                "comm_ms_per_update": 1e3 * max(m["comm"] for m in every) / slowest["updates"],
                "allreduce_alone_ms": 1e3 * max(m["allreduce_alone"] for m in every),
                "load_avg_1min": os.getloadavg()[0],
                "busy_others": others,
            }
            rows.append(row)
            print(
                f"ranks {size} {cell} H={H} B/rank={b} TBPTT({k1},{k2}): "
                f"{row['throughput_per_rank']:,.0f} steps*streams/s/rank, "
                f"{row['ms_per_update']:.2f} ms/update, comm {100 * row['comm_share']:.1f}% "
                f"({row['comm_ms_per_update']:.3f} ms/update; gradient "
                f"{row['grad_bytes'] / 1e6:.2f} MB, one all-reduce alone "
                f"{row['allreduce_alone_ms']:.3f} ms; other processes "
                f"{100 * row['busy_others']:.0f}% of the cores, load average "
                f"{row['load_avg_1min']:.1f})",
                flush=True,
            )
    if rank == 0 and json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=1)


def table(paths: list[str]) -> None:
    rows = [r for p in paths for f in sorted(glob.glob(p)) for r in json.load(open(f))]
    rows.sort(key=lambda r: (r["H"], r["ranks"]))
    print(
        "| config | ranks | steps x streams / s / rank | ms / update | comm share | "
        "comm ms / update | gradient | one all-reduce alone | busy (others) | load average |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['cell']} H={r['H']} B/rank={r['streams_per_rank']} "
            f"TBPTT({r['k1']},{r['k2']}) | {r['ranks']} | {r['throughput_per_rank']:,.0f} | "
            f"{r['ms_per_update']:.2f} | {100 * r['comm_share']:.1f}% | "
            f"{r['comm_ms_per_update']:.3f} | {r['grad_bytes'] / 1e6:.2f} MB | "
            f"{r['allreduce_alone_ms']:.3f} ms | {100 * r.get('busy_others', float('nan')):.0f}% | "
            f"{r.get('load_avg_1min', float('nan')):.1f} |"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", help="write rank 0's rows here")
    p.add_argument("--repeats", type=int, default=3, help="timed fits per configuration")
    p.add_argument("--table", nargs="+", metavar="JSON", help="print the Markdown table of runs")
    a = p.parse_args()
    if a.table:
        table(a.table)
    else:
        run(a.json, a.repeats)


if __name__ == "__main__":
    main()
