"""Noise-aware timing: machine load, thread counts, the GEMM peak and the timed rows.

Timed samples are interleaved across implementations (A B C A B C ...) so that drift
cancels in ratios, and each records how much CPU other processes used meanwhile; a sample
taken while the machine was busy is retried (a bounded number of times).
"""

from __future__ import annotations

import ctypes
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np

import tbptt_fast as tb

from .checks import check_impl
from .configs import Config, flops_per_step
from .runners import IMPLS, make_data, make_params, native_ok, unavailable_reason


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

    Returns one result dict per implementation (see ``report.RESULT_KEYS``).
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
    runners = {name: IMPLS[name].build(cfg, params, lr) for name in live}
    sample_runners(
        cfg, runners, rows, x, target, warm_steps, sample_s, repeats, max_retries, busy_limit
    )
    return list(rows.values())


def sample_runners(
    cfg: Config,
    runners: dict,
    rows: dict,
    x,
    target,
    warm_steps: int,
    sample_s: float,
    repeats: int,
    max_retries: int,
    busy_limit: float,
) -> None:
    """Time each runner (``name -> object with fit(x, target)``) on the same data:
    a warm-up sets each one's sample length, then ``repeats`` samples in
    alternating order, each retried on a busy machine; fills ``rows[name]``
    with the samples and the throughput figures (see ``report.RESULT_KEYS``)."""
    live, plan = list(runners), {}
    for name in live:
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
