"""Forward-only speed and memory: ``Model.evaluate`` against training and PyTorch.

For each configuration (LSTM, D = H, O = 16, float32, mse) it times, in one run:

- ``train``: ``Trainer.fit`` on the ``cpu`` backend, TBPTT(k, k), SGD;
- ``evaluate``: ``Model.evaluate`` on the ``cpu`` backend (forward only);
- ``torch no_grad``: ``nn.LSTM`` + ``nn.Linear`` under ``torch.no_grad()`` over
  the same data, in chunks of 512 steps carrying the state (skipped without torch);

and reports timesteps*B per second (best of ``--repeats`` samples) and the two
ratios the project aims at (evaluate >= 2.5x training, >= 1.5x torch no_grad).
The memory row runs ``evaluate`` in a subprocess at T = 2,000 and T = 200,000 and
reports the growth of the peak RSS over the RSS before the call: flat means it
does not grow with T.

    python benchmarks/bench_evaluate.py --json benchmarks/results/evaluate.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
import time

import numpy as np

import tbptt_fast as tb

CONFIGS = [(64, 8, 16), (256, 32, 16), (256, 32, 64)]  # (H, B, k)
STEPS = {64: 4000, 256: 1000}


def _best(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def time_config(hidden: int, batch: int, k: int, repeats: int) -> dict:
    T = STEPS[hidden]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((T, batch, hidden), dtype=np.float32)
    y = rng.standard_normal((T, batch, 16), dtype=np.float32)
    model = tb.Model("lstm", hidden, hidden, 16, seed=0)
    trainer = tb.Trainer(model, k1=k, k2=k, optimizer=tb.SGD(lr=1e-4), backend="cpu")
    row = {"hidden": hidden, "batch": batch, "k": k, "steps": T}
    row["train"] = T * batch / _best(lambda: trainer.fit(x, y), repeats)
    row["evaluate"] = T * batch / _best(lambda: model.evaluate(x, y, backend="cpu"), repeats)
    try:
        import torch
    except ImportError:
        row["torch_no_grad"] = None
        return row
    torch.set_num_threads(tb.get_num_threads())
    rnn, head = torch.nn.LSTM(hidden, hidden), torch.nn.Linear(hidden, 16)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    def torch_eval():
        with torch.no_grad():
            state, total = None, 0.0
            for lo in range(0, T, 512):
                out, state = rnn(xt[lo : lo + 512], state)
                total += float(((head(out) - yt[lo : lo + 512]) ** 2).mean(-1).sum())
            return total

    row["torch_no_grad"] = T * batch / _best(torch_eval, repeats)
    return row


MEMORY_SCRIPT = textwrap.dedent(
    """
    import sys, numpy as np, tbptt_fast as tb
    T = int(sys.argv[1])
    x = np.zeros((T, 8, 64), np.float32)
    y = np.zeros((T, 8, 16), np.float32)
    model = tb.Model("lstm", 64, 64, 16, seed=0)
    def rss(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak, so the allocation of the data does not count
    before = rss("VmRSS:")
    model.evaluate(x, y, backend="cpu")
    print(rss("VmHWM:") - before)
    """
)


def memory_rows() -> list[dict]:
    rows = []
    for T in (2_000, 200_000):
        out = subprocess.run(
            [sys.executable, "-c", MEMORY_SCRIPT, str(T)],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append({"steps": T, "peak_growth_bytes": int(out.stdout.split()[-1])})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed samples per row")
    parser.add_argument("--threads", type=int, default=1, help="native and torch threads")
    parser.add_argument("--json", help="write the results as JSON to this path")
    args = parser.parse_args(argv)
    tb.set_num_threads(args.threads)
    rows = [time_config(h, b, k, args.repeats) for h, b, k in CONFIGS]
    print(f"LSTM, D = H, O = 16, float32, {args.threads} thread(s); timesteps*B/s")
    print("| H | B | k | train (cpu) | evaluate (cpu) | torch no_grad | eval/train | eval/torch |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        tn = r["torch_no_grad"]
        vs_torch = "-" if tn is None else f"{r['evaluate'] / tn:.2f}"
        print(
            f"| {r['hidden']} | {r['batch']} | {r['k']} | {r['train']:,.0f} | {r['evaluate']:,.0f} "
            f"| {'-' if tn is None else f'{tn:,.0f}'} | {r['evaluate'] / r['train']:.2f} "
            f"| {vs_torch} |"
        )
    mem = memory_rows()
    print("\nevaluate memory (LSTM H=64, B=8): peak RSS growth over the call")
    for m in mem:
        print(f"  T = {m['steps']:>7,}: {m['peak_growth_bytes'] / 2**20:8.1f} MiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "rows": rows, "memory": mem}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
