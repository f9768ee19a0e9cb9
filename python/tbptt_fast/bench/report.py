"""The results: ratios between implementations, the text table, the JSON and the plot."""

from __future__ import annotations

import dataclasses
import json

from .configs import Config, label_of
from .runners import ALL_IMPLS, TORCH_IMPLS


def add_ratios(rows: list[dict], gemm: dict) -> None:
    """Fill ``gemm_fraction``, ``vs_best_torch``, ``vs_textbook`` (throughput ratios)."""
    groups = {}
    for r in rows:
        key = tuple(r[f.name] for f in dataclasses.fields(Config))
        groups.setdefault(key, []).append(r)
    for group in groups.values():
        ok = {r["impl"]: r for r in group if r["status"] == "ok"}
        torch_rows = [ok[n] for n in TORCH_IMPLS if n in ok]
        best_torch = max(torch_rows, key=lambda r: r["throughput"]) if torch_rows else None
        for r in ok.values():
            peak = gemm.get(r["threads"], {}).get("gflops")
            r["gemm_fraction"] = r["gflops"] / peak if peak else None
            r["best_torch"] = best_torch["impl"] if best_torch else None
            r["vs_best_torch"] = r["throughput"] / best_torch["throughput"] if best_torch else None
            tbk = ok.get("textbook")
            r["vs_textbook"] = r["throughput"] / tbk["throughput"] if tbk else None


RESULT_KEYS = (
    "cell hidden batch k1 k2 threads dtype out layers loss impl status message steps_per_call "
    "calls samples_s busy retries median_s min_s max_s timesteps_per_s throughput "
    "throughput_min throughput_max gflops busy_max gemm_fraction best_torch vs_best_torch "
    "vs_textbook check_err64 check_err32"
).split()
"""Keys of a row in the JSON (present when they apply; skipped rows have the first 13)."""


def _fmt(v, spec, none="-"):
    return none if v is None else format(v, spec)


def format_table(rows: list[dict]) -> str:
    """A fixed-width text table (also valid Markdown)."""
    head = (
        "| config | impl | timesteps*B/s | spread | GFLOP/s | % GEMM peak | x best torch "
        "| x textbook | busy | check |"
    )
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    notes = {}
    for r in rows:
        cfg = label_of(r)
        if r["status"] == "skipped":
            if "does not apply" not in r["message"]:
                notes.setdefault(r["message"], []).append(r["impl"])
            continue
        if r["status"] != "ok":
            lines.append(f"| {cfg} | {r['impl']} | {r['status']}: {r['message']} |||||||| ")
            continue
        spread = (
            f"{100 * (r['throughput_min'] / r['throughput'] - 1):+.0f}/"
            f"{100 * (r['throughput_max'] / r['throughput'] - 1):+.0f}%"
        )
        frac = r.get("gemm_fraction")
        check = "ref" if r["impl"] == "numpy" else _fmt(r.get("check_err32"), ".0e", "unchecked")
        lines.append(
            f"| {cfg} | {r['impl']} | {r['throughput']:,.0f} | {spread} | {r['gflops']:.2f} | "
            f"{_fmt(None if frac is None else 100 * frac, '.1f')} | "
            f"{_fmt(r.get('vs_best_torch'), '.2f')} | {_fmt(r.get('vs_textbook'), '.1f')} | "
            f"{100 * r['busy_max']:.0f}% | {check} |"
        )
    for msg, names in notes.items():
        lines.append(f"\nskipped {', '.join(dict.fromkeys(names))}: {msg}")
    return "\n".join(lines)


def write_plot(rows: list[dict], path: str) -> str | None:
    """Grouped bar chart, log scale: throughput per configuration and implementation.

    Returns None, or a message when matplotlib is missing (``main`` checks for it first).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (pip install matplotlib)"
    ok = [r for r in rows if r["status"] == "ok"]

    def label(r):
        return label_of(r).replace(" H=", "\nH=").replace(" (", "\n(").replace(" ce", "\nce")

    configs = list(dict.fromkeys(label(r) for r in ok))
    impls = [n for n in ALL_IMPLS if any(r["impl"] == n for r in ok)]
    width = 0.8 / max(1, len(impls))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(configs) + 2), 4.2), dpi=80)
    for j, name in enumerate(impls):
        xs, ys, lo, hi = [], [], [], []
        for i, c in enumerate(configs):
            for r in ok:
                if r["impl"] == name and label(r) == c:
                    xs.append(i + (j - (len(impls) - 1) / 2) * width)
                    ys.append(r["throughput"])
                    lo.append(r["throughput"] - r["throughput_min"])
                    hi.append(r["throughput_max"] - r["throughput"])
        ax.bar(xs, ys, width, yerr=[lo, hi], label=name, capsize=1)
    ax.set_yscale("log")
    ax.set_ylabel("timesteps x batch / s")
    ax.set_xticks(range(len(configs)))
    ax.set_xticklabels(configs, fontsize=6)
    ax.legend(fontsize=7, ncol=min(4, len(impls)))
    ax.grid(axis="y", alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return None


def report(result: dict, json_path: str | None, plot_path: str | None, log=print) -> None:
    """Print the table; write the JSON and the plot when asked."""
    log("")
    log(format_table(result["rows"]))
    save(result, json_path, plot_path, log)


def save(result: dict, json_path: str | None, plot_path: str | None, log=print) -> None:
    """Write the results as JSON and the plot, each when its path is given."""
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1, default=float)
        log(f"wrote {json_path}")
    if plot_path:
        msg = write_plot(result["rows"], plot_path)
        log(msg or f"wrote {plot_path}")
