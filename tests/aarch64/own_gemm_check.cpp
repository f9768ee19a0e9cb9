// A standalone check of the CPU kernels that need no OpenBLAS and no Python:
// the own per-step kernel (own_gemm.cpp, on whatever path the CPU takes: the
// generic one on aarch64) against a plain triple loop, plain and packed B,
// every row count 1..32 and several widths; and the thread pool (pool.cpp)
// running every task once for several thread counts. Built and run by
// tests/aarch64/run.sh (cross-compiled, under qemu-user).
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "cpu/own_gemm.h"
#include "cpu/pool.h"

namespace {

// The packed layout of blas.cpp's pack_panels (B [k, n] row-major).
std::vector<float> pack(int64_t k, int64_t n, const std::vector<float>& b, int64_t width) {
  std::vector<float> out(static_cast<size_t>(k * n));
  for (int64_t j0 = 0; j0 < n; j0 += width) {
    const int64_t nr = std::min(width, n - j0);
    for (int64_t p = 0; p < k; ++p)
      std::memcpy(&out[static_cast<size_t>(j0 * k + p * nr)], &b[static_cast<size_t>(p * n + j0)],
                  static_cast<size_t>(nr) * sizeof(float));
  }
  return out;
}

}  // namespace

int main() {
  using namespace tbptt::cpu;
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  int bad = 0, cases = 0;
  for (int64_t m = 1; m <= 32; ++m) {
    for (const int64_t n : {16, 48, 96, 256}) {
      for (const int64_t k : {1, 7, 64}) {
        for (const bool packed : {false, true}) {
          for (const float beta : {0.0f, 1.0f}) {
            std::vector<float> a(static_cast<size_t>(m * k)), b(static_cast<size_t>(k * n));
            std::vector<float> c(static_cast<size_t>(m * n)), want;
            for (auto& v : a) v = u(rng);
            for (auto& v : b) v = u(rng);
            for (auto& v : c) v = u(rng);
            want = c;
            for (int64_t i = 0; i < m; ++i)
              for (int64_t j = 0; j < n; ++j) {
                double s = 0.0;
                for (int64_t p = 0; p < k; ++p)
                  s += static_cast<double>(a[static_cast<size_t>(i * k + p)]) *
                       b[static_cast<size_t>(p * n + j)];
                want[static_cast<size_t>(i * n + j)] =
                    static_cast<float>(s + beta * want[static_cast<size_t>(i * n + j)]);
              }
            const std::vector<float> bp = packed ? pack(k, n, b, own_panel_width()) : b;
            own_gemm(m, 0, n, k, a.data(), k, bp.data(), n, packed, beta, c.data(), n);
            ++cases;
            for (size_t i = 0; i < c.size(); ++i) {
              if (std::fabs(c[i] - want[i]) > 1e-5f * (1.0f + static_cast<float>(k))) {
                if (bad++ < 5)
                  std::printf("mismatch m=%ld n=%ld k=%ld packed=%d beta=%g at %zu: %g vs %g\n",
                              static_cast<long>(m), static_cast<long>(n), static_cast<long>(k),
                              packed, beta, i, c[i], want[i]);
                break;
              }
            }
          }
        }
      }
    }
  }
  for (const int threads : {1, 2, 3, 5}) {
    std::vector<int> hits(1000, 0);
    parallel_for(threads, 1000, [&](int64_t i) { hits[static_cast<size_t>(i)] += 1; });
    for (const int h : hits) bad += h != 1;
    ++cases;
  }
  std::printf("own kernel path %s: %d cases, %d failed\n", own_kernel_isa(), cases, bad);
  return bad == 0 ? 0 : 1;
}
