#!/usr/bin/env bash
# Run the concurrency tests against a ThreadSanitizer build of tbptt_fast._core.
#
#   bash tests/tsan/run.sh [pytest args...]   # the concurrency tests (~1.5 min + build)
#   bash tests/tsan/run.sh --ci               # the bounded subset CI runs (~35 s + build)
#
# Builds csrc/ with -fsanitize=thread into build/tsan (never the editable
# install's build/), assembles a package copy in build/tsan/pkg, and runs the
# tests that use threads with libtsan preloaded: a trainer used from a second
# thread (native and numpy), Ctrl-C / signals arriving from another thread
# during a native fit, and the engine's own thread pool (batch groups, product
# parts, two trainers at once). Every report, from this process or from a
# test's subprocess, goes to a log file under build/tsan/reports; the run fails
# if there is any. CPython and OpenBLAS are not instrumented: the reports that
# lie wholly inside them are suppressed in tests/tsan/tsan.supp (each with its
# reason); a report with one of the project's frames is never suppressed.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=$(python -c "import sys; print(sys.executable)")   # the real binary, not a shim script
BUILD=build/tsan
start=$(date +%s)
cmake -S . -B "$BUILD" -G Ninja -DSKBUILD_PROJECT_VERSION=0.1.0 -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DTBPTT_SANITIZE=OFF -DTBPTT_WERROR=ON -DTBPTT_CUDA=OFF \
  -DCMAKE_CXX_FLAGS="-fsanitize=thread -fno-omit-frame-pointer" \
  -DCMAKE_MODULE_LINKER_FLAGS="-fsanitize=thread" \
  -Dpybind11_DIR="$("$PY" -c 'import pybind11; print(pybind11.get_cmake_dir())')" \
  -DPython_EXECUTABLE="$PY" >/dev/null
ninja -C "$BUILD" -j2
rm -rf "$BUILD/pkg" "$BUILD/reports" && mkdir -p "$BUILD/pkg" "$BUILD/reports"
cp -r python/tbptt_fast "$BUILD/pkg/"
rm -f "$BUILD"/pkg/tbptt_fast/_core*.so
cp "$BUILD"/_core*.so "$BUILD/pkg/tbptt_fast/"
# Run at the start of every Python process (the tests' subprocesses too):
# - an editable install's import hook would shadow PYTHONPATH: drop it, so the
#   sanitized copy is the one imported;
# - load extensions lazily bound: under RTLD_NOW (Python's default) the loader
#   runs the target_clones resolvers of csrc/cpu/vmath.h while it relocates
#   _core, before the GOT entries of the TSan calls instrumented into those
#   resolvers are bound, and the process dies (SEGV at a small address in
#   "sum_squares [clone .resolver]"). Lazily bound, they run at the first call.
cat > "$BUILD/pkg/sitecustomize.py" <<'PY'
import os
import sys

sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.setdlopenflags(os.RTLD_LAZY)
PY
# GCC 12's TSan cannot place its shadow memory on kernels with high mmap
# randomisation (vm.mmap_rnd_bits > 28: "FATAL: ThreadSanitizer: unexpected
# memory mapping"): run without ASLR where setarch may (it works with it here).
NOASLR=()
if setarch "$(uname -m)" -R true 2>/dev/null; then NOASLR=(setarch "$(uname -m)" -R); fi
TSAN_LIB=$(gcc -print-file-name=libtsan.so)
# halt_on_error=0: collect every report of the run; log_path: one file per
# process (the tests' subprocesses included), counted below.
TSAN_OPTS="suppressions=$PWD/tests/tsan/tsan.supp:halt_on_error=0:second_deadlock_stack=1"
TSAN_OPTS+=":log_path=$PWD/$BUILD/reports/tsan"
export PYTHONPATH="$PWD/$BUILD/pkg" TBPTT_REQUIRE_NATIVE=1
# The engine's pool with two threads, as on this machine (the thread-count
# tests set 1, 2, 3 and 5 themselves).
export OPENBLAS_NUM_THREADS=2
K="thread or ctrl_c or signal or (kernel_sizes and -2-float)"
K="($K) and not kernel_path and not bad_isa"
if [[ "${1:-}" == "--ci" ]]; then
  shift
  # Bounded for CI: without the signal handler test (40 s here: its fit of
  # 300,000 steps runs to the end), whose signal from another thread the
  # Ctrl-C test sends too, and with the thread-count checks on the two
  # smaller shapes (batch groups; column parts and pointwise row blocks).
  K="($K) and not signal_handler_is_python_s and not H256 and not H96 and not cifg-H48"
  K="$K and not gru-H160 and not emb-H32"
fi
# The concurrency tests: every test that starts a thread or changes the thread
# count (-k thread: the second-thread and num_threads tests), the interrupts
# (a signal sent from another thread during a native fit), and engine runs
# with two threads (the kernel sizes of test_native_build.py run at 2 threads),
# and tests/test_threads.py: bit-identical results for 1, 2, 3 and 5 threads
# and two trainers running in two threads at once.
set -- tests/test_hardening.py tests/test_native_build.py tests/test_fuzz.py \
  tests/test_threads.py tests/test_embedding.py -k "$K" "$@"
rc=0
"${NOASLR[@]}" env LD_PRELOAD="$TSAN_LIB" TSAN_OPTIONS="$TSAN_OPTS" "$PY" -c '
import sys
import tbptt_fast._native as n
assert "/build/tsan/pkg/" in n.core.__file__, n.core.__file__
import pytest
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "-m", "not torch and not gpu and not slow",
                      *sys.argv[1:]]))
' "$@" || rc=$?
reports=$(cat "$BUILD"/reports/tsan.* 2>/dev/null | grep -c '^WARNING: ThreadSanitizer' || true)
echo "tsan: $reports report(s), pytest exit $rc, $(($(date +%s) - start)) s"
if [[ "$reports" != 0 || "$rc" != 0 ]]; then
  cat "$BUILD"/reports/tsan.* 2>/dev/null || true
  exit $((rc != 0 ? rc : 1))
fi
