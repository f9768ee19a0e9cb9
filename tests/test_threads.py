"""Threads: results bit-identical for any thread count, and every kernel path.

The CPU engine cuts its work from the shapes alone (batch groups, product
parts, elementwise chunks) and runs the pieces on its pool; the thread count
only decides who runs which piece. So a fit with 1, 2, 3 or 5 threads (more
threads than this machine has cores included) must give the same bits. The
configurations take each path: batch groups (W_hh small), one group with the
per-step products cut into column parts (W_hh large), packed W_hh (float,
k1 >= 8), the NT/NN OpenBLAS products (float64), recompute, embedding.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import tbptt_fast as tb

pytestmark = pytest.mark.skipif(not tb.native_available(), reason="native module not built")

# (cell, D, H, O, L, B, k1, k2, dtype, loss, optimizer, overlap, vocab)
CONFIGS = {
    # the three reproducers of the hardening issue (float32, SGD, mse)
    "lstm-H256-B32-16-64": (
        "lstm",
        32,
        256,
        8,
        1,
        32,
        16,
        64,
        "float32",
        "mse",
        "sgd",
        "stored",
        0,
    ),
    "gru-H128-B24-8-24": ("gru", 16, 128, 4, 1, 24, 8, 24, "float32", "mse", "sgd", "stored", 0),
    "tanh-H96-B40-4-12": (
        "rnn_tanh",
        12,
        96,
        3,
        1,
        40,
        4,
        12,
        "float32",
        "mse",
        "sgd",
        "stored",
        0,
    ),
    # batch groups + packed W_hh, Adam and clipping, two layers
    "lstm-H64-B32-16-16": ("lstm", 64, 64, 5, 2, 32, 16, 16, "float32", "mse", "adam", "stored", 0),
    # float64 products (OpenBLAS), recompute, cross-entropy
    "cifg-H48-B20-5-9": ("cifg", 7, 48, 6, 2, 20, 5, 9, "float64", "ce", "adam", "recompute", 0),
    # one group, products cut in parts, float64
    "gru-H160-B33-8-8": ("gru", 20, 160, 4, 1, 33, 8, 8, "float64", "mse", "sgd", "stored", 0),
    # token inputs (the embedding's gradient is scattered in row order)
    "lstm-emb-H32-B16-8-12": (
        "lstm",
        16,
        32,
        11,
        1,
        16,
        8,
        12,
        "float32",
        "ce",
        "sgd",
        "stored",
        11,
    ),
}

THREADS = (1, 2, 3, 5)


def _data(cfg, T, seed):
    _, D, _, O, _, B, _, _, dtype, loss, _, _, vocab = cfg
    rng = np.random.default_rng(seed)
    if vocab:
        x = rng.integers(0, vocab, size=(T, B))
    else:
        x = rng.normal(size=(T, B, D)).astype(dtype)
    if loss == "ce":
        y = rng.integers(0, O, size=(T, B))
    else:
        y = rng.normal(size=(T, B, O)).astype(dtype)
    mask = (rng.random((T, B)) > 0.1).astype(dtype)
    resets = rng.random((T, B)) < 0.03
    return x, y, mask, resets


def _fit(cfg, threads, T=40):
    cell, D, H, O, L, _, k1, k2, dtype, loss, opt, overlap, vocab = cfg
    before = tb.get_num_threads()
    try:
        tb.set_num_threads(threads)
        model = tb.Model(cell, D, H, O, L, dtype=dtype, seed=4, vocab_size=vocab or None)
        optimizer = tb.SGD(lr=0.05, momentum=0.9) if opt == "sgd" else tb.Adam(lr=1e-3)
        tr = tb.Trainer(
            model,
            k1=k1,
            k2=k2,
            loss="cross_entropy" if loss == "ce" else "mse",
            optimizer=optimizer,
            clip_grad_norm=0.5,
            overlap=overlap,
        )
        x, y, mask, resets = _data(cfg, T, seed=9)
        res = tr.fit(x, y, mask=mask, resets=resets, return_outputs=True, return_grads=True)
        out = model.predict(x[:7], backend="cpu").outputs
        return res, model.state_dict(), out
    finally:
        tb.set_num_threads(before)


def _assert_same(a, b):
    (ra, pa, oa), (rb, pb, ob) = a, b
    np.testing.assert_array_equal(ra.losses, rb.losses)
    np.testing.assert_array_equal(ra.outputs, rb.outputs)
    for ga, gb in zip(ra.grads, rb.grads, strict=True):
        for k in ga:
            np.testing.assert_array_equal(ga[k], gb[k], err_msg=k)
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)
    np.testing.assert_array_equal(oa, ob)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bit_identical_for_any_thread_count(name):
    cfg = CONFIGS[name]
    runs = [_fit(cfg, n) for n in THREADS]
    for r in runs[1:]:
        _assert_same(runs[0], r)
    # the run really trained (a test that cannot fail on a no-op)
    assert np.isfinite(runs[0][0].losses).all() and len(runs[0][0].losses) >= 2


def test_two_trainers_in_two_threads_equal_one_after_the_other():
    """Two trainers running at the same moment (each with 2 threads) give the
    bits they give when run one after the other."""
    names = ["lstm-H64-B32-16-16", "gru-H128-B24-8-24"]
    alone = {n: _fit(CONFIGS[n], 2) for n in names}

    def run(n, together, errors):
        try:
            together[n] = _fit(CONFIGS[n], 2)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(repr(e))

    for _ in range(3):
        together, errors = {}, []
        ths = [threading.Thread(target=run, args=(n, together, errors)) for n in names]
        for t in ths:
            t.start()
        for t in ths:
            t.join()
        assert not errors, errors
        for n in names:
            _assert_same(alone[n], together[n])


def test_thread_count_setting_survives_a_run():
    """The engine holds OpenBLAS at one thread while it runs; the user's
    setting is what get_num_threads reports before, during and after."""
    before = tb.get_num_threads()
    seen = []
    try:
        tb.set_num_threads(3)
        model = tb.Model("lstm", 4, 8, 2, dtype="float32", seed=0)
        tr = tb.Trainer(model, k1=4)
        x = np.zeros((12, 2, 4), np.float32)
        tr.fit(
            x,
            np.zeros((12, 2, 2), np.float32),
            on_update=lambda info: seen.append(tb.get_num_threads()),
        )
        assert seen == [3, 3, 3]
        assert tb.get_num_threads() == 3
    finally:
        tb.set_num_threads(before)


def _isas():
    """Kernel paths this CPU can run (TBPTT_ISA values)."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        pass
    out = ["generic"]
    if " avx2" in flags and " fma" in flags:
        out.append("avx2")
    if all(f" {f}" in flags for f in ("avx512f", "avx512vl", "avx512bw", "avx512dq")):
        out.append("avx512")
    return out


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
def test_every_kernel_path(isa):
    """The fast-path battery (against the reference) and the thread-count
    check again, in a process that runs the own kernel on one ISA path (avx2:
    also with TBPTT_NO_AVX512, as a CPU without AVX-512 runs)."""
    if isa not in _isas():
        pytest.skip(f"this CPU cannot run the {isa} path")
    env = {**os.environ, "TBPTT_ISA": isa}
    if isa == "avx2":  # also as a CPU without AVX-512, OpenBLAS on its AVX2 kernels
        env.update(TBPTT_NO_AVX512="1", OPENBLAS_CORETYPE="Haswell")
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import tbptt_fast._native as n; print(n.core.build_info()['own_kernel'])",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert probe.stdout.strip() == isa, probe.stdout + probe.stderr
    here = os.path.dirname(__file__)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error"]
    cmd += [os.path.join(here, "test_native_battery.py"), os.path.join(here, "test_threads.py")]
    cmd += ["-k", "(fast_paths and cpu) or (any_thread_count and (H64 or H256))"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "3 passed" in out.stdout, out.stdout[-2000:]


def test_bad_isa_is_refused():
    env = {**os.environ, "TBPTT_ISA": "sse9"}
    code = "import tbptt_fast as tb, numpy as np\n" + (
        "tb.Trainer(tb.Model('lstm', 2, 16, 1, dtype='float32'), k1=8)"
        ".fit(np.zeros((16, 2, 2), np.float32), np.zeros((16, 2, 1), np.float32))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode != 0
    assert "TBPTT_ISA must be avx512, avx2 or generic" in out.stderr
