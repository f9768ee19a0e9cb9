#!/usr/bin/env bash
# GPU checks of the CUDA engine, for a lent GPU machine (x86-64, CUDA driver,
# nvcc, PyTorch's python3 with nvidia-cublas; no network). One script, about
# 8 minutes at most: build with CUDA, run the CUDA rows of the test suite, a
# compute-sanitizer memcheck subset, and the CUDA benchmark rows. Logs go to
# $OUT (or ./gpu-logs) as build.log, tests.log, memcheck.log, bench.log.
#
# Wheels missing there (scipy-openblas32 at least) are carried in .whl/:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux2014_x86_64 -d .whl scipy-openblas32
# and the device tool is called with carry [".whl"] and the command
#   bash tests/gpu/run.sh
# Without .whl/ the script uses whatever python3 already has.
set -uo pipefail
cd "$(dirname "$0")/../.."
LOG="${OUT:-$PWD/gpu-logs}"
mkdir -p "$LOG"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
status=0
t0=$(date +%s)
note() { echo "== [$(( $(date +%s) - t0 ))s] $*" | tee -a "$LOG/summary.log"; }

note "machine"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
  nvcc --version | tail -2 || true
  "$PY" -c "import sys, numpy; print(sys.version); print('numpy', numpy.__version__)"
  "$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.is_available())" || true
  "$PY" -m pip list 2>/dev/null | grep -i -E "nvidia-cu|cublas|scikit-build|pybind11|openblas|cmake|ninja" || true
} 2>&1 | tee "$LOG/machine.log"

SITE=/tmp/tbptt-site
rm -rf "$SITE" && mkdir -p "$SITE"
if compgen -G ".whl/*.whl" > /dev/null; then
  note "installing carried wheels from .whl/"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE/deps" .whl/*.whl 2>&1 | tee -a "$LOG/build.log"
  export PYTHONPATH="$SITE/deps${PYTHONPATH:+:$PYTHONPATH}"
fi

note "build with TBPTT_CUDA=ON"
if ! timeout 300 "$PY" -m pip install -v --no-build-isolation --no-deps --no-index \
      --target "$SITE/pkg" -Ccmake.define.TBPTT_CUDA=ON -Ccmake.define.TBPTT_WERROR=ON \
      -Cbuild-dir=/tmp/tbptt-build -Cbuild.tool-args=-j16 . > "$LOG/build.log" 2>&1; then
  note "BUILD FAILED (tail of build.log follows)"
  tail -60 "$LOG/build.log"
  exit 1
fi
grep -E "tbptt_fast:|warning" "$LOG/build.log" | head -40
export PYTHONPATH="$SITE/pkg${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - <<'PYEOF' 2>&1 | tee -a "$LOG/summary.log"
import tbptt_fast as tb
from tbptt_fast import _native
print("module:", tb.__file__)
print("build_info:", _native.core.build_info())
print("cuda_available:", tb.cuda_available())
assert _native.core.build_info()["cuda"], "built without CUDA"
assert tb.cuda_available(), "CUDA build but no usable GPU/cuBLAS seen"
PYEOF
if [ "${PIPESTATUS[0]}" != 0 ]; then note "CUDA NOT AVAILABLE"; exit 1; fi

note "tests: CUDA rows of the suite (-k cuda)"
timeout 200 "$PY" -m pytest tests -q --maxfail=10 -p no:cacheprovider -m "gpu or not gpu" -k cuda \
  --durations=15 > "$LOG/tests.log" 2>&1
rc=$?
tail -40 "$LOG/tests.log"
[ $rc = 0 ] || { note "TESTS FAILED rc=$rc"; status=1; }

note "tests again with CUDA graphs on (TBPTT_CUDA_GRAPHS=strict: a failed capture fails)"
TBPTT_CUDA_GRAPHS=strict timeout 100 "$PY" -m pytest tests/test_native_battery.py tests/test_invariants.py \
  tests/test_cuda_device_inputs.py -q --maxfail=10 -p no:cacheprovider -m "gpu or not gpu" -k cuda \
  > "$LOG/tests-graphs.log" 2>&1
rc=$?
tail -15 "$LOG/tests-graphs.log"
[ $rc = 0 ] || { note "TESTS WITH GRAPHS FAILED rc=$rc"; status=1; }

note "compute-sanitizer memcheck (small subset vs the NumPy reference)"
cat > /tmp/tbptt_memcheck.py <<'PYEOF'
import numpy as np
import tbptt_fast as tb

rng = np.random.default_rng(0)
worst = 0.0
for cell, dtype, overlap, loss, k1, k2, L in [
    ("lstm", "float64", "stored", "mse", 3, 5, 2),
    ("gru", "float64", "recompute", "cross_entropy", 2, 5, 1),
    ("rnn_tanh", "float32", "stored", "mse", 4, 2, 1),
    ("rnn_relu", "float64", "recompute", "mse", 2, None, 2),
]:
    T, B, D, H, O = 11, 3, 4, 5, 3
    x = rng.standard_normal((T, B, D)).astype(dtype)
    if loss == "mse":
        y = rng.standard_normal((T, B, O)).astype(dtype)
    else:
        y = rng.integers(0, O, (T, B))
    mask = (rng.random((T, B)) > 0.2).astype(dtype)
    resets = rng.random((T, B)) > 0.8
    res = {}
    for backend in ("numpy", "cuda"):
        m = tb.Model(cell, input_size=D, hidden_size=H, output_size=O, num_layers=L,
                     dtype=dtype, seed=3)
        tr = tb.Trainer(m, k1=k1, k2=k2, loss=loss, optimizer=tb.Adam(lr=0.01),
                        clip_grad_norm=1.0, overlap=overlap, backend=backend)
        r = tr.fit(x, y, mask=mask, resets=resets, return_grads=True, return_outputs=True)
        r2 = tr.fit(x[:5], y[:5], flush=False)
        res[backend] = (r, r2, m.state_dict(), tr.state)
    a, b = res["cuda"], res["numpy"]
    tol = 1e-10 if dtype == "float64" else 1e-4
    def cmp(u, v, what):
        global worst
        u, v = np.asarray(u), np.asarray(v)
        err = float(np.max(np.abs(u - v))) / max(1.0, float(np.max(np.abs(v)))) if v.size else 0.0
        worst = max(worst, err / tol)
        assert err <= tol, f"{cell} {dtype} {overlap} {loss}: {what} differs by {err:.3g}"
    cmp(a[0].losses, b[0].losses, "losses")
    cmp(a[0].outputs, b[0].outputs, "outputs")
    for ga, gb in zip(a[0].grads, b[0].grads):
        for k in gb:
            cmp(ga[k], gb[k], f"grad {k}")
    for k in b[2]:
        cmp(a[2][k], b[2][k], f"param {k}")
    print("ok", cell, dtype, overlap, loss, k1, k2, L)
print(f"memcheck subset ok; worst error / tol = {worst:.3g}")
PYEOF
if command -v compute-sanitizer > /dev/null; then
  timeout 120 compute-sanitizer --tool memcheck --error-exitcode 3 --print-limit 20 \
    "$PY" /tmp/tbptt_memcheck.py > "$LOG/memcheck.log" 2>&1
  rc=$?
  tail -15 "$LOG/memcheck.log"
  [ $rc = 0 ] || { note "MEMCHECK FAILED rc=$rc"; status=1; }
else
  note "compute-sanitizer not found; running the subset plainly"
  timeout 60 "$PY" /tmp/tbptt_memcheck.py 2>&1 | tee "$LOG/memcheck.log" || status=1
fi

note "bench: cpu thread scaling (1, 2, 4, ... up to this machine's cores)"
timeout 300 "$PY" -m tbptt_fast bench --scaling --no-check --repeats 2 --sample-seconds 0.3 \
  --max-retries 0 --json "$LOG/scaling.json" 2>&1 | tee "$LOG/scaling.log" || true

note "bench: CUDA rows"
if "$PY" -m tbptt_fast bench --help 2>/dev/null | grep -q -- "cuda"; then
  timeout 120 "$PY" -m tbptt_fast bench --backend cuda 2>&1 | tee "$LOG/bench.log"
else
  timeout 140 "$PY" - <<'PYEOF' 2>&1 | tee "$LOG/bench.log"
# LSTM, B=64, D=H: tbptt_fast cuda (fit over the whole sequence, data from
# the host) against PyTorch nn.LSTM (cuDNN) with the usual detach loop, data
# already on the GPU. TBPTT(k, k): one chunk per update; TBPTT(16, 64): torch
# re-runs the last 64 steps every 16 from the state saved then (the standard
# way to get overlapping windows in PyTorch).
import os
import time
import numpy as np
import tbptt_fast as tb

try:
    import torch
except ImportError:
    torch = None

try:
    import cupy
except ImportError:
    cupy = None

def ours(H, k1, k2, T, B=64, on_gpu=False, graphs=False):
    """Seconds for one fit over T steps; on_gpu: the data are CuPy arrays (read in place);
    graphs: TBPTT_CUDA_GRAPHS=1 (read when the trainer is made)."""
    m = tb.Model("lstm", input_size=H, hidden_size=H, output_size=H, seed=0)
    os.environ["TBPTT_CUDA_GRAPHS"] = "1" if graphs else "0"
    tr = tb.Trainer(m, k1=k1, k2=k2, optimizer=tb.SGD(lr=1e-3), backend="cuda")
    os.environ.pop("TBPTT_CUDA_GRAPHS")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((T, B, H)).astype(np.float32)
    y = rng.standard_normal((T, B, H)).astype(np.float32)
    if on_gpu:
        if cupy is None:
            return float("nan")
        x, y = cupy.asarray(x), cupy.asarray(y)
        cupy.cuda.Device().synchronize()
    warm = 3 * max(k1, k2)  # every ring position twice: graphs are recorded the 2nd time
    tr.fit(x[:warm], y[:warm])
    tr.reset_state()
    t = time.perf_counter()
    tr.fit(x, y)
    elapsed = time.perf_counter() - t
    if graphs:
        print("   graph use:", tr._engine.graph_stats(), flush=True)
    return elapsed

def theirs(H, k1, k2, T, B=64, tf32=True):
    torch.backends.cudnn.allow_tf32 = tf32
    dev = "cuda"
    lstm = torch.nn.LSTM(H, H).to(dev)
    lin = torch.nn.Linear(H, H).to(dev)
    opt = torch.optim.SGD(list(lstm.parameters()) + list(lin.parameters()), lr=1e-3)
    x = torch.randn(T, B, H, device=dev)
    y = torch.randn(T, B, H, device=dev)
    def run(steps):
        z = torch.zeros(1, B, H, device=dev)
        state = (z, z)
        saved = {0: state}
        for t in range(k1, steps + 1, k1):
            w = max(0, t - k2)
            st = saved[w] if k2 > k1 else state
            out, new = lstm(x[w:t], st)
            loss = torch.nn.functional.mse_loss(lin(out[-k1:]), y[t - k1:t])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            state = (new[0].detach(), new[1].detach())
            if k2 > k1:
                saved[t] = state
                saved.pop(t - k2, None)
        torch.cuda.synchronize()
    run(2 * k1 + k2)
    t = time.perf_counter()
    run(T)
    return time.perf_counter() - t

print("ours: data from the host; ours-gpu: CuPy arrays read in place; +graphs: also")
print("TBPTT_CUDA_GRAPHS=1; speedup = torch / best of ours")
print(f"{'H':>5} {'k1':>3} {'k2':>3} {'T':>5} {'ours s':>8} {'ours-gpu s':>10} {'+graphs s':>9} {'torch s':>8} {'torch-fp32 s':>12} {'speedup':>8}")
for H in (64, 256, 1024):
    for k1, k2 in ((64, 64), (16, 64)):
        T = 2048 if H < 1024 else 1024
        a = ours(H, k1, k2, T)
        g = ours(H, k1, k2, T, on_gpu=True)
        gg = ours(H, k1, k2, T, on_gpu=True, graphs=True)
        b = theirs(H, k1, k2, T) if torch is not None else float("nan")
        c = theirs(H, k1, k2, T, tf32=False) if torch is not None else float("nan")
        best = min(a, g, gg)
        print(f"{H:5d} {k1:3d} {k2:3d} {T:5d} {a:8.3f} {g:10.3f} {gg:9.3f} {b:8.3f} {c:12.3f} {b / best:8.2f}x", flush=True)
PYEOF
fi
note "done, status=$status"
exit $status
