"""Benchmark harness: tbptt_fast against a textbook NumPy loop and PyTorch loops.

Every row of a benchmark is one configuration (cell, H = D, B, k1, k2, threads) and one
implementation. Before timing, each implementation is checked against tbptt_fast's NumPy
reference (see ``check_impl``); a mismatch aborts that row. Timed samples are interleaved
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
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import functools
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np

import tbptt_fast as tb

from ..reference import GATES
from .peers import textbook, torch_loops


# ------------------------------------------------------------------ configurations
@dataclasses.dataclass(frozen=True)
class Config:
    """One benchmark configuration; the input size D equals the hidden size H."""

    cell: str
    hidden: int
    batch: int
    k1: int
    k2: int
    threads: int = 1
    dtype: str = "float32"
    out: int = 16
    layers: int = 1

    @property
    def label(self) -> str:
        return f"{self.cell} H={self.hidden} B={self.batch} ({self.k1},{self.k2}) t={self.threads}"

    def key(self) -> dict:
        return dataclasses.asdict(self)


def flops_per_step(cfg: Config) -> float:
    """FLOPs of one training timestep (all B elements), as defined in the module docstring."""
    g, h, b = GATES[cfg.cell], cfg.hidden, cfg.batch
    fwd = cfg.layers * 2.0 * b * (h + h) * g * h
    readout = 2.0 * b * h * cfg.out
    return fwd * (1.0 + 2.0 * cfg.k2 / cfg.k1) + 3.0 * readout


def make_matrix(cells, hidden, batch, ks, threads, **kw) -> list[Config]:
    """Cartesian product of the lists (ks: list of (k1, k2)); skips B/H duplicates."""
    out = []
    for t in threads:
        for cell in cells:
            for h in hidden:
                for b in batch:
                    for k1, k2 in ks:
                        out.append(Config(cell, h, b, k1, k2, t, **kw))
    return out


PRESETS = {
    # a few seconds: for the tests
    "tiny": dict(
        configs=[Config("lstm", 8, 2, 4, 4), Config("gru", 8, 2, 2, 4)],
        repeats=1,
        sample_s=0.02,
        max_retries=0,
    ),
    # the default: under 2 minutes on a 2-core machine
    "quick": dict(
        configs=[
            Config("lstm", 64, 8, 16, 16, 1),
            Config("gru", 64, 8, 16, 16, 1),
            Config("rnn_tanh", 64, 8, 16, 16, 1),
            Config("lstm", 256, 32, 16, 16, 2),
            Config("lstm", 256, 32, 16, 64, 2),
        ],
        repeats=3,
        sample_s=0.25,
        max_retries=2,
    ),
    # every configuration that a target names, for all three cells, 1 and 2 threads
    "full": dict(
        configs=[
            Config(cell, h, b, k1, k2, t)
            for t in (1, 2)
            for cell in ("lstm", "gru", "rnn_tanh")
            for (h, b, k1, k2) in [
                (64, 8, 16, 16),
                (64, 32, 16, 16),
                (256, 32, 16, 16),
                (256, 32, 16, 64),
                (256, 32, 1, 16),
                (1024, 32, 64, 64),
            ]
        ],
        repeats=5,
        sample_s=0.5,
        max_retries=3,
    ),
}


# ------------------------------------------------------------------ implementations
def native_ok() -> bool:
    """True when tbptt_fast's native module (backend "cpu") is importable."""
    return tb.native_available()


class TbRunner:
    """tbptt_fast ``Trainer`` with SGD and mse on one backend/overlap rule."""

    def __init__(self, cfg: Config, params: dict, backend: str, overlap: str, lr: float):
        model = tb.Model(
            cfg.cell, cfg.hidden, cfg.hidden, cfg.out, cfg.layers, dtype=cfg.dtype, seed=0
        )
        model.load_state_dict(params)  # copies, cast to the model's dtype
        self.trainer = tb.Trainer(
            model,
            k1=cfg.k1,
            k2=cfg.k2,
            loss="mse",
            optimizer=tb.SGD(lr=lr),
            overlap=overlap,
            backend=backend,
        )

    def fit(self, x, target, return_grads=False):
        res = self.trainer.fit(x, target, return_grads=return_grads)
        return res.losses, res.grads


@dataclasses.dataclass
class Impl:
    """An implementation: how to build it, when it applies, and which rule it follows."""

    build: Callable[[Config, dict, float], object]
    applies: Callable[[Config], bool]
    overlap: str  # the tbptt_fast overlap rule it must match
    family: str  # "tbptt_fast" | "textbook" | "torch"


def _peer(cls):
    def build(cfg, params, lr):
        return cls(cfg.cell, params, cfg.k1, cfg.k2, lr=lr, dtype=cfg.dtype)

    return build


IMPLS = {
    "numpy": Impl(
        lambda c, p, lr: TbRunner(c, p, "numpy", "stored", lr),
        lambda c: True,
        "stored",
        "tbptt_fast",
    ),
    "cpu": Impl(
        lambda c, p, lr: TbRunner(c, p, "cpu", "stored", lr),
        lambda c: True,
        "stored",
        "tbptt_fast",
    ),
    "cpu-recompute": Impl(
        lambda c, p, lr: TbRunner(c, p, "cpu", "recompute", lr),
        lambda c: c.k1 < c.k2,
        "recompute",
        "tbptt_fast",
    ),
    "textbook": Impl(_peer(textbook.TextbookTBPTT), lambda c: True, "stored", "textbook"),
    "torch-seq": Impl(_peer(torch_loops.TorchSeq), lambda c: c.k1 == c.k2, "stored", "torch"),
    "torch-cell": Impl(_peer(torch_loops.TorchCell), lambda c: c.k1 == c.k2, "stored", "torch"),
    "torch-recompute": Impl(
        _peer(torch_loops.TorchRecompute),
        lambda c: c.k1 < c.k2,
        "recompute",
        "torch",
    ),
}


ALL_IMPLS = tuple(IMPLS)
TORCH_IMPLS = tuple(n for n, impl in IMPLS.items() if impl.family == "torch")


def unavailable_reason(name: str) -> str | None:
    """Why implementation ``name`` cannot run on this machine, or None if it can."""
    if name not in IMPLS:
        return f"unknown implementation {name!r}; choose from {', '.join(ALL_IMPLS)}"
    if name.startswith("cpu") and not native_ok():
        return "the native module tbptt_fast._core is not built (backend 'cpu')"
    if IMPLS[name].family == "torch":
        try:
            torch_loops.import_torch()
        except ImportError as exc:
            return str(exc)
    return None


def make_params(cfg: Config, seed: int = 0) -> dict:
    """The initial parameters of a row: ``tb.Model(...).state_dict()`` (PyTorch layout)."""
    model = tb.Model(
        cfg.cell, cfg.hidden, cfg.hidden, cfg.out, cfg.layers, dtype=cfg.dtype, seed=seed
    )
    return model.state_dict()  # fresh copies


def make_data(cfg: Config, steps: int, seed: int = 1):
    """x ``[steps, B, H]`` and target ``[steps, B, O]`` of the row's dtype."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((steps, cfg.batch, cfg.hidden)).astype(cfg.dtype)
    target = (0.5 * rng.standard_normal((steps, cfg.batch, cfg.out))).astype(cfg.dtype)
    return x, target


# ------------------------------------------------------------------ correctness checks
def max_rel_err(got: dict, ref: dict) -> float:
    """SPEC section 4 error: max over arrays of ``max|a-b| / max(1, max|b|)``."""
    err = 0.0
    for k, b in ref.items():
        a = np.asarray(got[k], dtype=np.float64)
        b = np.asarray(b, dtype=np.float64)
        if a.shape != b.shape:
            return math.inf
        err = max(err, float(np.max(np.abs(a - b))) / max(1.0, float(np.max(np.abs(b)))))
    return err


@functools.lru_cache(maxsize=16)
def _reference(c: Config, overlap: str, lr: float, steps: int):
    """Parameters, data and the NumPy reference's gradients of one check; shared by
    every implementation checked on the same row (they copy what they are given)."""
    params = make_params(c)
    x, target = make_data(c, steps, seed=2)
    _, ref = TbRunner(c, params, "numpy", overlap, lr).fit(x, target, True)
    return params, x, target, ref


def check_impl(name: str, cfg: Config, lr: float = 0.01) -> dict:
    """Check an implementation's gradients against tbptt_fast backend "numpy".

    Two checks, same cell and (k1, k2) as the row:

    1. float64 on a small model (H = D <= 16, B <= 3, O <= 4) over
       ``k1 * (ceil(k2/k1) + 2)`` steps, so several overlapping windows occur: every
       update's gradient must agree to 1e-8 (relative, SPEC section 4 formula);
    2. float32 at the row's own size: the first update's gradient to 1e-4.

    The reference uses the overlap rule the implementation follows ("recompute" for the
    torch recompute loop and cpu-recompute, "stored" otherwise). Returns a dict with
    ``ok`` (bool), ``err64``, ``err32`` and ``message``.
    """
    impl = IMPLS[name]
    small = dataclasses.replace(
        cfg,
        hidden=min(cfg.hidden, 16),
        batch=min(cfg.batch, 3),
        out=min(cfg.out, 4),
        dtype="float64",
    )
    out = {"ok": True, "err64": None, "err32": None, "message": "ok"}
    for tag, c, steps, tol in [
        ("float64", small, cfg.k1 * (math.ceil(cfg.k2 / cfg.k1) + 2), 1e-8),
        ("float32", cfg, cfg.k1, 1e-4),
    ]:
        params, x, target, ref = _reference(c, impl.overlap, lr, steps)
        _, got = impl.build(c, params, lr).fit(x, target, True)
        if len(got) != len(ref):
            err = math.inf
        else:
            err = max(max_rel_err(g, r) for g, r in zip(got, ref, strict=True))
        out["err64" if tag == "float64" else "err32"] = err
        if not err <= tol:
            out["ok"] = False
            out["message"] = (
                f"{name} disagrees with tbptt_fast numpy (overlap={impl.overlap!r}) in "
                f"{tag}: max relative gradient error {err:.3g} > {tol:g} over "
                f"{len(ref)} updates ({c.cell} H={c.hidden} B={c.batch} k1={c.k1} k2={c.k2})"
            )
            return out
    return out


# ------------------------------------------------------------------ machine noise
def _busy_cpu_seconds() -> float:
    import psutil

    t = psutil.cpu_times()
    fields = ("user", "nice", "system", "irq", "softirq", "steal")
    return sum(getattr(t, f, 0.0) for f in fields)


def _own_cpu_seconds() -> float:
    import psutil

    t = psutil.Process().cpu_times()
    return t.user + t.system + t.children_user + t.children_system


class NoiseMeter:
    """CPU seconds used by other processes during a measurement (psutil; 0 without it)."""

    def __init__(self):
        try:
            import psutil  # noqa: F401

            self.enabled = True
        except ImportError:
            self.enabled = False

    def start(self):
        self.t0 = time.perf_counter()
        if self.enabled:
            self.busy0, self.own0 = _busy_cpu_seconds(), _own_cpu_seconds()

    def stop(self) -> tuple[float, float]:
        """Returns (wall seconds, fraction of the machine other processes used)."""
        wall = time.perf_counter() - self.t0
        if not self.enabled:
            return wall, 0.0
        other = (_busy_cpu_seconds() - self.busy0) - (_own_cpu_seconds() - self.own0)
        return wall, max(0.0, other) / (wall * (os.cpu_count() or 1))


def wait_for_quiet(max_s: float, busy_limit: float, log=print) -> float:
    """Wait (up to ``max_s`` seconds) until other processes use <= ``busy_limit`` of the CPUs.

    Returns the last measured load (fraction of the machine).
    """
    meter, waited, busy = NoiseMeter(), 0.0, 0.0
    while waited < max_s and meter.enabled:
        meter.start()
        time.sleep(0.5)
        busy = meter.stop()[1]
        if busy <= busy_limit:
            break
        if waited == 0.0:
            log(f"    machine busy ({100 * busy:.0f}% used by others): waiting up to {max_s:.0f} s")
        waited += 0.5
    return busy


# ------------------------------------------------------------------ threads and GEMM
def openblas32_path() -> str | None:
    """Path of scipy-openblas32's ``libscipy_openblas.so`` (the native engine's BLAS)."""
    try:
        import scipy_openblas32
    except ImportError:
        return None
    path = os.path.join(scipy_openblas32.get_lib_dir(), f"lib{scipy_openblas32.get_library()}")
    for ext in (".so", ".dylib", ".dll"):
        if os.path.exists(path + ext):
            return path + ext
    return None


def numpy_blas_path() -> str | None:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    for info in threadpool_info():
        if info.get("user_api") == "blas" and "numpy" in info.get("filepath", ""):
            return info["filepath"]
    return None


def set_threads(n: int) -> None:
    """The same thread count for every library a row uses."""
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(n)  # numpy's OpenBLAS (numpy backend, textbook), OpenMP pools
    except ImportError:
        pass
    try:  # scipy-openblas32, the native engine's BLAS (works without _core too)
        tb.set_num_threads(n)
    except RuntimeError:
        pass
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)


def gemm_peak(
    threads: int, n: int = 2048, reps: int = 5, max_extra: int = 20, busy_limit: float = 0.15
) -> dict:
    """GFLOP/s of an ``n^3`` float32 GEMM (best of ``reps``) on ``threads`` threads.

    A repetition during which other processes used more than ``busy_limit`` of the
    machine does not count towards ``reps`` (at most ``max_extra`` more are run).

    Uses scipy-openblas32 (the library tbptt_fast's native engine loads) through ctypes,
    or numpy when numpy itself is linked against that same library.
    """
    set_threads(threads)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(np.float32)
    b = rng.standard_normal((n, n)).astype(np.float32)
    c = np.zeros((n, n), np.float32)
    path = openblas32_path()
    np_path = numpy_blas_path()
    if path and not (np_path and os.path.realpath(path) == os.path.realpath(np_path)):
        source = f"ctypes scipy_cblas_sgemm ({path})"
        lib = ctypes.CDLL(path)
        fn = lib.scipy_cblas_sgemm
        p = ctypes.c_void_p
        fn.argtypes = [ctypes.c_int] * 6 + [ctypes.c_float, p, ctypes.c_int, p, ctypes.c_int]
        fn.argtypes += [ctypes.c_float, p, ctypes.c_int]

        def run():  # row-major, no transposes
            fn(101, 111, 111, n, n, n, 1.0, a.ctypes.data, n, b.ctypes.data, n, 0.0,
               c.ctypes.data, n)  # fmt: skip
    else:  # numpy is linked against that same library, or it was not found
        source = f"numpy ({np_path})" if path else f"numpy ({np_path}; scipy-openblas32 not found)"

        def run():
            np.matmul(a, b, out=c)

    run()
    best, best_busy, meter = math.inf, math.inf, NoiseMeter()
    for _ in range(reps + max_extra):  # extra repetitions while the machine is busy
        meter.start()
        run()
        wall, busy = meter.stop()
        best, best_busy = min(best, wall), min(best_busy, busy)
        reps -= busy <= busy_limit
        if reps <= 0:
            break
    if not np.allclose(c[:2, :2], a[:2] @ b[:, :2], rtol=1e-3, atol=1e-2):
        raise RuntimeError("the GEMM used for the peak gave a wrong product")
    return {
        "threads": threads,
        "n": n,
        "gflops": 2.0 * n**3 / best / 1e9,
        "busy": best_busy,
        "source": source,
    }


# ------------------------------------------------------------------ timing
def _round_up(v: int, m: int) -> int:
    return max(m, -(-v // m) * m)


def time_config(
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
    """Check and time every implementation in ``names`` on one configuration.

    Returns one result dict per implementation (see ``RESULT_KEYS``).
    """
    set_threads(cfg.threads)
    rows = {}
    for name in names:
        row = {**cfg.key(), "impl": name, "status": "ok", "message": ""}
        rows[name] = row
        reason = unavailable_reason(name)
        if reason is None and not IMPLS[name].applies(cfg):
            reason = "does not apply to this (k1, k2)"
        if reason:
            row.update(status="skipped", message=reason)
            continue
        if check and name != "numpy":
            res = check_impl(name, cfg, lr)
            row.update(check_err64=res["err64"], check_err32=res["err32"])
            if not res["ok"]:
                row.update(status="check_failed", message=res["message"])
                log(f"    CHECK FAILED: {res['message']}")
                continue
    live = [n for n in names if rows[n]["status"] == "ok"]
    if not live:
        return list(rows.values())
    set_threads(cfg.threads)
    span = max(cfg.k1, cfg.k2)
    warm_steps = _round_up(2 * span, cfg.k1)
    cap = max(warm_steps, _round_up((24 << 20) // (4 * cfg.batch * cfg.hidden), cfg.k1))
    data_steps = min(cap, _round_up(8192, cfg.k1))
    x, target = make_data(cfg, max(data_steps, warm_steps))
    params = make_params(cfg)
    runners, plan = {}, {}
    for name in live:
        runners[name] = IMPLS[name].build(cfg, params, lr)
        t0 = time.perf_counter()
        runners[name].fit(x[:warm_steps], target[:warm_steps])
        rate = warm_steps / max(time.perf_counter() - t0, 1e-9)  # timesteps per second
        steps = min(x.shape[0], max(warm_steps, _round_up(int(rate * sample_s), cfg.k1)))
        calls = max(1, round(rate * sample_s / steps))
        plan[name] = (steps, calls)
        rows[name].update(steps_per_call=steps, calls=calls, samples_s=[], busy=[], retries=0)
    meter = NoiseMeter()
    for rep in range(repeats):
        order = live if rep % 2 == 0 else live[::-1]
        for name in order:
            steps, calls = plan[name]
            best = None
            for attempt in range(max_retries + 1):
                meter.start()
                for _ in range(calls):
                    runners[name].fit(x[:steps], target[:steps])
                wall, busy = meter.stop()
                if best is None or busy < best[1]:
                    best = (wall, busy)
                if busy <= busy_limit:
                    break
                rows[name]["retries"] += 1
                if attempt < max_retries:
                    time.sleep(0.2)
            rows[name]["samples_s"].append(best[0])
            rows[name]["busy"].append(best[1])
    for name in live:
        row = rows[name]
        steps, calls = plan[name]
        work = steps * calls  # timesteps per sample
        med = statistics.median(row["samples_s"])
        row.update(
            median_s=med,
            min_s=min(row["samples_s"]),
            max_s=max(row["samples_s"]),
            timesteps_per_s=work / med,
            throughput=work * cfg.batch / med,
            throughput_min=work * cfg.batch / max(row["samples_s"]),
            throughput_max=work * cfg.batch / min(row["samples_s"]),
            gflops=flops_per_step(cfg) * work / med / 1e9,
            busy_max=max(row["busy"]),
        )
    return list(rows.values())


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


# ------------------------------------------------------------------ targets
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


# ------------------------------------------------------------------ output
RESULT_KEYS = (
    "cell hidden batch k1 k2 threads dtype out layers impl status message steps_per_call "
    "calls samples_s busy retries median_s min_s max_s timesteps_per_s throughput "
    "throughput_min throughput_max gflops busy_max gemm_fraction best_torch vs_best_torch "
    "vs_textbook check_err64 check_err32"
).split()
"""Keys of a row in the JSON (present when they apply; skipped rows have the first 12)."""


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
        cfg = f"{r['cell']} H={r['hidden']} B={r['batch']} ({r['k1']},{r['k2']}) t={r['threads']}"
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


def format_targets(targets: list[dict]) -> str:
    lines = ["| target | config | value | result |", "|---|---|---|---|"]
    for t in targets:
        mark = "PASS" if t["pass"] else "MISS"
        if not t["official"]:
            mark += " (info)"
        lines.append(f"| {t['target']} | {t['config']} | {t['value']:.2f} | {mark} |")
    return "\n".join(lines)


def write_plot(rows: list[dict], path: str) -> str | None:
    """Grouped bar chart, log scale: throughput per configuration and implementation.

    Returns None, or a message when matplotlib is missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (pip install matplotlib)"
    ok = [r for r in rows if r["status"] == "ok"]
    configs = list(
        dict.fromkeys(
            f"{r['cell']}\nH={r['hidden']} B={r['batch']}\n({r['k1']},{r['k2']}) t={r['threads']}"
            for r in ok
        )
    )
    impls = [n for n in ALL_IMPLS if any(r["impl"] == n for r in ok)]
    width = 0.8 / max(1, len(impls))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(configs) + 2), 4.2), dpi=80)
    for j, name in enumerate(impls):
        xs, ys, lo, hi = [], [], [], []
        for i, c in enumerate(configs):
            for r in ok:
                label = (
                    f"{r['cell']}\nH={r['hidden']} B={r['batch']}\n"
                    f"({r['k1']},{r['k2']}) t={r['threads']}"
                )
                if r["impl"] == name and label == c:
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


def machine_info() -> dict:
    info = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "numpy": np.__version__,
        "numpy_blas": numpy_blas_path(),
        "native_blas": openblas32_path(),
        "argv": sys.argv,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    info["tbptt_fast"] = tb.__version__
    info["native"] = native_ok()
    if "torch" in sys.modules:
        info["torch"] = sys.modules["torch"].__version__
    return info


# ------------------------------------------------------------------ driver
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
    """Run a benchmark matrix; returns ``{"machine", "gemm", "rows", "targets"}``.

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
        "targets": evaluate_targets(rows),
    }


def parse_ks(text: str) -> list[tuple[int, int]]:
    """``"16:16,16:64,1:16"`` -> ``[(16, 16), (16, 64), (1, 16)]``."""
    out = []
    for part in text.split(","):
        k1, _, k2 = part.partition(":")
        out.append((int(k1), int(k2 or k1)))
    return out


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


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
    p.add_argument("--hidden", type=_ints, help="comma list of H (= D)")
    p.add_argument("--batch", type=_ints, help="comma list of B")
    p.add_argument("--k", type=parse_ks, help="comma list of k1:k2, e.g. 16:16,16:64")
    p.add_argument("--threads", type=_ints, help="comma list of thread counts")
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


def report(result: dict, json_path: str | None, plot_path: str | None, log=print) -> None:
    """Print the tables; write the JSON and the plot when asked."""
    log("")
    log(format_table(result["rows"]))
    if result["targets"]:
        log("")
        log(format_targets(result["targets"]))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1, default=float)
        log(f"wrote {json_path}")
    if plot_path:
        msg = write_plot(result["rows"], plot_path)
        log(msg or f"wrote {plot_path}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``tbptt-fast bench`` (``python -m tbptt_fast bench``)."""
    args = build_parser().parse_args(argv)
    configs, opts = configs_from_args(args)
    impls = [n.strip() for n in args.impls.split(",") if n.strip()]
    bad = [n for n in impls if n not in IMPLS]
    if bad:
        print(f"unknown implementation(s) {bad}; choose from {', '.join(ALL_IMPLS)}")
        return 2

    def log(msg):
        print(msg, flush=True)

    result = run(
        configs,
        impls,
        busy_limit=args.busy_limit,
        check=not args.no_check,
        wait_quiet=args.wait_quiet,
        log=log,
        **opts,
    )
    report(result, args.json, args.plot, log)
    return 0
